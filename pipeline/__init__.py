"""A run as a stream of chunks, in bounded memory.

The plan is made lazily, `plan.chunk_requests` requests at a time (pipeline/rounds.py, which
is also the fill loop). Each chunk is generated, then turned into documents and filtered
(pipeline/chunks.py, with the stages of pipeline/stages.py: exact dedup, the quality chain on
worker processes, MinHash against the index), spilled in plan order to the run's work
directory `<out>/_state/runs/<run_id>/`, and released; the next chunk generates while this one
is filtered (pipeline/drive.py), in a generation process of its own (generation/process.py),
so the two do not share an interpreter. What crosses chunks is one object, `RunState`: the
exact-dedup map, the near-duplicate candidate store (on disk: filters/dedup/candidates.py),
counters.

After the last round, the near-duplicate clusters are decided over the whole run and one
streaming pass writes the version (pipeline/finalize.py). So the version is the same whatever
the chunk size and worker count, and memory holds about two chunks plus about 150 bytes per
candidate document.
"""

from booksmith.pipeline.chunks import Chunk, ChunkPipeline, ChunkStats, RunState
from booksmith.pipeline.run import StreamingRun

__all__ = ["Chunk", "ChunkPipeline", "ChunkStats", "RunState", "StreamingRun"]
