"""The blocking client, generated from `forklift._async` by `python -m forklift._unasync`."""
