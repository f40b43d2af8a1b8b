"""`booksmith view`: a read-only local web app to read a dataset, its rejects and its topics.

- `store.py`: an output directory or one version (local or a URL, through shards/fs.py), its
  manifests, and queries over its Parquet shards with DuckDB (never a whole version in memory);
- `search.py`: the full-text index (SQLite FTS5), built once per version outside it;
- `evidence.py`: what the pages show beside a document: markdown, the shared passages of a
  near-duplicate pair, a manifest with every credential redacted;
- `app.py`: the pages (Starlette + Jinja2 templates in templates/, one stylesheet in static/).

It sits on top with flows/ (it reads schemas and shards only) and writes nothing inside a
version: the search index lives under the output's `_state/view/` (or the user cache for URLs).
"""
