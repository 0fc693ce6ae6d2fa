//! Task networking.
