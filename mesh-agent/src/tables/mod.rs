//! Load-balancer tables.
