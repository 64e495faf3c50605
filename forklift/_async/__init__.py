"""The hand-written asyncio client: `forklift._unasync` generates `forklift._sync` from it."""
