//! eBPF loading and maps.
