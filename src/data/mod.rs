//! Training data: LLaVA conversation JSON, the synthetic visual-QA world, batching.
