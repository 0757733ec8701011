//! Result stores: where task states and return values are kept.
