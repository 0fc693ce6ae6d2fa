//! Embedded DNS (being written).
