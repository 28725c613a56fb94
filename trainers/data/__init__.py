"""Data layer: dataset readers (classification, class-incremental, quotes for causal LMs) and sampling."""
