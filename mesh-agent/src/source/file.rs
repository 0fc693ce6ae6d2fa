//! The YAML state-file source (being written).
