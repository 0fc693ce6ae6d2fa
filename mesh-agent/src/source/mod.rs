//! Sources of the managers state.
