"""booksmith: synthetic textbook-quality pretraining data, topics to token shards.

The one import root. The repository keeps the design card's top-level folders (schemas/,
prompts/, generation/, filters/, shards/, pipeline/, flows/, trainer/); pyproject.toml's
package-dir mapping installs each of them under this package, so `booksmith.filters` is the
repository's filters/ folder, in a wheel and in an editable install alike. See docs/design.md.
"""

__version__ = "0.1.0"
