"""Person search as a product: index a photo folder with a trained model, query it from the CLI or a local web page.

Modules: `encoder` (load a checkpoint or exported folder), `index` (build/load embeddings), `query` (rank),
`grid` (the results picture), `web` (the local page). `search.py` at the top level is the command line.
"""
