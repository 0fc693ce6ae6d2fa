//! mesh-agent: the node agent of the mesh routing mesh.
//!
//! Layers, from the managers' state to the packet:
//! - [`model`]: Swarm's model (nodes, networks, services, tasks) and its strict validation.
//! - [`source`]: where snapshots of that state come from (the state file today).
//! - [`tables`]: pure computation of the load-balancer tables from a snapshot, and the diff
//!   against what is programmed.
//! - [`ebpf`]: loading the embedded eBPF object, pinning, attaching, writing the maps.
//! - [`attach`]: task networking: bridges, veth pairs into task namespaces (rtnetlink).
//! - [`dns`]: the embedded DNS server on 127.0.0.11 in each task.
//! - [`agent`]: the reconcile loop tying them together.
//! - [`cli`]: `status`, `demo`, `whoami` and other commands.

pub mod agent;
pub mod attach;
pub mod cli;
pub mod dns;
pub mod ebpf;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod overlay;
pub mod source;
pub mod tables;
