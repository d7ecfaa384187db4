"""EnMAP Level-2A products: names, metadata, discovery, opening, and the synthetic generator."""
