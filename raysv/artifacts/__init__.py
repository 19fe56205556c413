"""On-disk formats shared by every stage: checkpoint folders, shards, embeddings, labels, JSON.

Nothing here imports a model, a method or a stage: these modules only say how files
are laid out and read, so every layer above can use them.
"""
