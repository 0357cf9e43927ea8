//! Integration tests live in tests/*.rs; see tests/README.md.
