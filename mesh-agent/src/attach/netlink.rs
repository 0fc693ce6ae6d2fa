//! Typed rtnetlink operations (links, addresses, routes), each error naming the operation
//! and the object. One [`Netlink`] talks to one network namespace: the one its socket was
//! created in.

use std::{net::Ipv4Addr, os::fd::RawFd};

use futures::TryStreamExt;
use netlink_packet_core::DefaultNla;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{AfSpecInet, AfSpecUnspec, InfoData, InfoVeth, LinkAttribute, LinkMessage},
    },
};

/// Per-device IPv4 settings for [`Netlink::set_ipv4_conf`]: `IPV4_DEVCONF_*` ids
/// (include/uapi/linux/ip.h).
pub mod ipv4_conf {
    pub const FORWARDING: u16 = 1;
    pub const RP_FILTER: u16 = 8;
    pub const ACCEPT_LOCAL: u16 = 23;
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{op} {name}: {source}")]
    Op {
        op: &'static str,
        name: String,
        source: rtnetlink::Error,
    },
    #[error("{op} {name}: not found")]
    NotFound { op: &'static str, name: String },
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    /// Index of the bridge it is enslaved to.
    pub controller: Option<u32>,
    /// For a veth: its peer's index (in the peer's namespace).
    pub peer: Option<u32>,
}

fn link_from_msg(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: [0; 6],
        controller: None,
        peer: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(mac) if mac.len() == 6 => l.mac.copy_from_slice(mac),
            LinkAttribute::Controller(c) => l.controller = Some(*c),
            LinkAttribute::Link(p) => l.peer = Some(*p),
            _ => {}
        }
    }
    l
}

fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV || m.raw_code() == -libc::ENOENT)
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

/// A netlink handle bound to the namespace it was opened in.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Open a connection in the calling thread's namespace; the connection task is spawned on
    /// the current tokio runtime.
    pub fn open() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(link_from_msg(&m))),
            Ok(None) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(source) => Err(NetlinkError::Op {
                op: "get link",
                name: name.into(),
                source,
            }),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(link_from_msg(&m))),
            Ok(None) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(source) => Err(NetlinkError::Op {
                op: "get link",
                name: format!("#{index}"),
                source,
            }),
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let s = self.handle.link().get().execute();
        s.map_ok(|m| link_from_msg(&m))
            .try_collect()
            .await
            .map_err(|source| NetlinkError::Op {
                op: "list links",
                name: String::new(),
                source,
            })
    }

    async fn must_link(&self, name: &str) -> Result<Link, NetlinkError> {
        self.link(name)
            .await?
            .ok_or_else(|| NetlinkError::NotFound {
                op: "get link",
                name: name.into(),
            })
    }

    /// Create a bridge with a fixed MAC (no-op if it exists with it) and return it. Without
    /// an explicit MAC a bridge takes its lowest port's, which changes as ports come and go.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        mtu: u32,
        mac: [u8; 6],
    ) -> Result<Link, NetlinkError> {
        if let Some(l) = self.link(name).await? {
            if l.mac != mac {
                let msg = LinkUnspec::new_with_index(l.index)
                    .address(mac.to_vec())
                    .build();
                self.set_link(msg, "set bridge address", name.into())
                    .await?;
                return self.must_link(name).await;
            }
            return Ok(l);
        }
        let msg = LinkBridge::new(name)
            .mtu(mtu)
            .address(mac.to_vec())
            .up()
            .build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => {}
            Err(e) if is_exists(&e) => {}
            Err(source) => {
                return Err(NetlinkError::Op {
                    op: "create bridge",
                    name: name.into(),
                    source,
                });
            }
        }
        self.must_link(name).await
    }

    /// Create a veth pair `host` ↔ `peer`, with `peer` created directly inside the namespace
    /// `peer_ns_fd` with the MAC `peer_mac`.
    pub async fn create_veth_into(
        &self,
        host: &str,
        peer: &str,
        peer_ns_fd: RawFd,
        peer_mac: [u8; 6],
        mtu: u32,
    ) -> Result<Link, NetlinkError> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .address(peer_mac.to_vec())
            .mtu(mtu)
            .setns_by_fd(peer_ns_fd)
            .build();
        let msg = rtnetlink::LinkVeth::new(host, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .mtu(mtu)
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|source| NetlinkError::Op {
                op: "create veth",
                name: host.into(),
                source,
            })?;
        self.must_link(host).await
    }

    /// Enslave `index` to bridge `bridge` and bring it up.
    pub async fn set_controller_up(&self, index: u32, bridge: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index)
            .controller(bridge)
            .up()
            .build();
        self.set_link(msg, "attach to bridge", format!("#{index}"))
            .await
    }

    pub async fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.set_link(msg, "set up", format!("#{index}")).await
    }

    /// Set per-device IPv4 settings (`net.ipv4.conf.<dev>.*`, by [`ipv4_conf`] id) of link
    /// `index` over rtnetlink (RTM_SETLINK, IFLA_AF_SPEC → AF_INET → IFLA_INET_CONF): this
    /// works where /proc/sys is mounted read-only, as in the agent's container.
    pub async fn set_ipv4_conf(&self, index: u32, conf: &[(u16, u32)]) -> Result<(), NetlinkError> {
        let mut nested = Vec::with_capacity(conf.len() * 8);
        for &(id, v) in conf {
            nested.extend_from_slice(&8u16.to_ne_bytes());
            nested.extend_from_slice(&id.to_ne_bytes());
            nested.extend_from_slice(&v.to_ne_bytes());
        }
        const IFLA_INET_CONF: u16 = 1;
        const NLA_F_NESTED: u16 = 0x8000;
        let inet = AfSpecInet::Other(DefaultNla::new(IFLA_INET_CONF | NLA_F_NESTED, nested));
        let mut msg = LinkUnspec::new_with_index(index).build();
        msg.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
                inet,
            ])]));
        self.set_link(msg, "set IPv4 settings of", format!("#{index}"))
            .await
    }

    /// RTM_SETLINK with `msg`; an error names `op` and the link.
    async fn set_link(
        &self,
        msg: LinkMessage,
        op: &'static str,
        name: String,
    ) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|source| NetlinkError::Op { op, name, source })
    }

    pub async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(l) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(l.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(NetlinkError::Op {
                op: "delete link",
                name: name.into(),
                source,
            }),
        }
    }

    /// Add `addr/prefix` to link `index` (no-op if present).
    pub async fn add_addr(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        match self
            .handle
            .address()
            .add(index, addr.into(), prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_exists(&e) => Ok(()),
            Err(source) => Err(NetlinkError::Op {
                op: "add address",
                name: format!("{addr}/{prefix} on #{index}"),
                source,
            }),
        }
    }

    /// Every IPv4 address of the namespace.
    pub async fn ipv4_addrs(&self) -> Result<Vec<(u32, Ipv4Addr)>, NetlinkError> {
        let mut out = Vec::new();
        let mut s = self.handle.address().get().execute();
        loop {
            match s.try_next().await {
                Ok(Some(m)) => {
                    for a in &m.attributes {
                        if let AddressAttribute::Local(std::net::IpAddr::V4(ip))
                        | AddressAttribute::Address(std::net::IpAddr::V4(ip)) = a
                            && !out.contains(&(m.header.index, *ip))
                        {
                            out.push((m.header.index, *ip));
                        }
                    }
                }
                Ok(None) => break,
                Err(source) => {
                    return Err(NetlinkError::Op {
                        op: "list addresses",
                        name: String::new(),
                        source,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Replace the default route with one via `gw` on `index`.
    pub async fn set_default_route(&self, gw: Ipv4Addr, index: u32) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build();
        match self.handle.route().add(msg).replace().execute().await {
            Ok(()) => Ok(()),
            Err(source) => Err(NetlinkError::Op {
                op: "set default route",
                name: format!("via {gw}"),
                source,
            }),
        }
    }

    /// The interface of the IPv4 default route, if any.
    pub async fn default_route_ifindex(&self) -> Result<Option<u32>, NetlinkError> {
        use rtnetlink::packet_route::route::RouteAttribute;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut s = self.handle.route().get(msg).execute();
        loop {
            match s.try_next().await {
                Ok(Some(r)) => {
                    if r.header.destination_prefix_length != 0 {
                        continue;
                    }
                    for a in &r.attributes {
                        if let RouteAttribute::Oif(i) = a {
                            return Ok(Some(*i));
                        }
                    }
                }
                Ok(None) => return Ok(None),
                Err(source) => {
                    return Err(NetlinkError::Op {
                        op: "list routes",
                        name: String::new(),
                        source,
                    });
                }
            }
        }
    }
}
