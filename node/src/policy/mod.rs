//! Policy: the rule model, its file format, compilation into a fast matcher, and evaluation.
