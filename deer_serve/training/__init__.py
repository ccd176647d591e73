"""Training pipelines for the embedded default models (corpus, tokenizer, target, drafter).

No Ray / pydantic imports in this package.
"""
