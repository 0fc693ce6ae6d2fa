//! The netlink operations the overlay needs beyond [`crate::attach::Netlink`]: VXLAN links,
//! the VXLAN FDB (`AF_BRIDGE` neighbours with `NTF_SELF`) and IPv4 neighbour entries, on
//! `rtnetlink` 0.24 directly. Each operation returns the raw [`rtnetlink::Error`]; the
//! caller wraps it with the network, device and entry it concerns.

use std::net::{IpAddr, Ipv4Addr};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::{
    Handle, LinkUnspec, LinkVxlan,
    packet_core::{
        NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
        NetlinkPayload,
    },
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
        route::RouteType,
    },
};

use super::plan::{FdbEntry, Mac, NeighEntry, ObservedFdb, ObservedNeigh, VxlanSpec};

const NUD_PERMANENT: u16 = 0x80;

/// The errno of a netlink error reply, if it is one (positive, e.g. `libc::EEXIST`).
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn is_errno(e: &rtnetlink::Error, codes: &[i32]) -> bool {
    errno(e).is_some_and(|c| codes.contains(&c))
}

/// A link as the overlay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayLink {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    /// Set for VXLAN links whose settings could all be read.
    pub vxlan: Option<VxlanSpec>,
    pub mtu: Option<u32>,
    pub controller: Option<u32>,
    pub up: bool,
}

impl OverlayLink {
    pub fn is_vxlan(&self) -> bool {
        self.kind == Some(InfoKind::Vxlan)
    }
}

fn link_from_msg(m: &LinkMessage) -> OverlayLink {
    let mut l = OverlayLink {
        index: m.header.index,
        name: String::new(),
        kind: None,
        vxlan: None,
        mtu: None,
        controller: None,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    let (mut vni, mut local, mut port, mut learning, mut proxy) = (None, None, None, None, None);
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(v) => l.mtu = Some(*v),
            LinkAttribute::Controller(c) => l.controller = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => l.kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Vxlan(vs)) => {
                            for v in vs {
                                match v {
                                    InfoVxlan::Id(x) => vni = Some(*x),
                                    InfoVxlan::Local(x) => local = Some(*x),
                                    InfoVxlan::Port(x) => port = Some(*x),
                                    InfoVxlan::Learning(x) => learning = Some(*x),
                                    InfoVxlan::Proxy(x) => proxy = Some(*x),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if let (Some(vni), Some(local), Some(port), Some(learning), Some(proxy)) =
        (vni, local, port, learning, proxy)
    {
        l.vxlan = Some(VxlanSpec {
            vni,
            local,
            port,
            learning,
            proxy,
        });
    }
    l
}

fn fdb_from_msg(m: &NeighbourMessage) -> Option<ObservedFdb> {
    let mut mac = None;
    let mut o = ObservedFdb {
        mac: Mac::ZERO,
        dst: None,
        port: None,
        vni: None,
        ifindex: None,
        src_vni: None,
        permanent: u16::from(m.header.state) & NUD_PERMANENT != 0,
    };
    for a in &m.attributes {
        match a {
            // The bridge's own entries for the port carry NDA_MASTER: not the device's.
            NeighbourAttribute::Controller(_) => return None,
            NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_slice(b),
            NeighbourAttribute::Destination(d) => {
                o.dst = match d {
                    NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
                    NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
                    // AF_BRIDGE dumps carry NDA_DST as raw bytes.
                    NeighbourAddress::Other(b) => match b.len() {
                        4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                        _ => None,
                    },
                    _ => None,
                }
            }
            NeighbourAttribute::Port(p) => o.port = Some(*p),
            NeighbourAttribute::Vni(v) => o.vni = Some(*v),
            NeighbourAttribute::IfIndex(i) => o.ifindex = Some(*i),
            NeighbourAttribute::SourceVni(v) => o.src_vni = Some(*v),
            _ => {}
        }
    }
    if m.header.flags.contains(NeighbourFlags::Controller) {
        return None;
    }
    o.mac = mac?;
    Some(o)
}

fn neigh_from_msg(m: &NeighbourMessage) -> Option<ObservedNeigh> {
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(*v4),
            NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_slice(b),
            _ => {}
        }
    }
    Some(ObservedNeigh {
        ip: ip?,
        mac,
        permanent: u16::from(m.header.state) & NUD_PERMANENT != 0,
    })
}

/// Typed overlay operations on one namespace's netlink socket.
#[derive(Clone)]
pub struct OverlayNetlink {
    handle: Handle,
}

impl OverlayNetlink {
    pub fn new(handle: Handle) -> Self {
        OverlayNetlink { handle }
    }

    /// Send a request and wait for its acknowledgement.
    async fn ack(&self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut handle = self.handle.clone();
        let mut replies = handle.request(req)?;
        while let Some(m) = replies.next().await {
            if let NetlinkPayload::Error(e) = m.payload
                && e.code.is_some()
            {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
        Ok(())
    }

    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<OverlayLink>, rtnetlink::Error> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(|m| link_from_msg(&m))
            .try_collect()
            .await
    }

    pub async fn link(&self, name: &str) -> Result<Option<OverlayLink>, rtnetlink::Error> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m.map(|m| link_from_msg(&m))),
            Err(e) if is_errno(&e, &[libc::ENODEV, libc::ENOENT]) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Create a VXLAN device enslaved to `bridge`, up. No group, no remote: every peer is an
    /// FDB entry.
    pub async fn create_vxlan(
        &self,
        name: &str,
        spec: &VxlanSpec,
        mtu: u32,
        bridge: u32,
    ) -> Result<(), rtnetlink::Error> {
        let msg = LinkVxlan::new(name, spec.vni)
            .local(spec.local)
            .port(spec.port)
            .learning(spec.learning)
            .proxy(spec.proxy)
            .mtu(mtu)
            .controller(bridge)
            .up()
            .build();
        self.handle.link().add(msg).execute().await
    }

    /// Enslave, set the MTU and bring up an existing link.
    pub async fn set_controller_mtu_up(
        &self,
        index: u32,
        bridge: u32,
        mtu: u32,
    ) -> Result<(), rtnetlink::Error> {
        let msg = LinkUnspec::new_with_index(index)
            .controller(bridge)
            .mtu(mtu)
            .up()
            .build();
        self.handle.link().set(msg).execute().await
    }

    /// Delete a link; gone already is fine.
    pub async fn delete_link(&self, index: u32) -> Result<(), rtnetlink::Error> {
        match self.handle.link().del(index).execute().await {
            Err(e) if is_errno(&e, &[libc::ENODEV, libc::ENOENT]) => Ok(()),
            r => r,
        }
    }

    /// The device's own FDB entries (`bridge fdb show dev <dev>` lines marked `self`).
    pub async fn fdb_list(&self, index: u32) -> Result<Vec<ObservedFdb>, rtnetlink::Error> {
        let mut s = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await? {
            if m.header.ifindex != index {
                continue;
            }
            if let Some(o) = fdb_from_msg(&m) {
                out.push(o);
            }
        }
        Ok(out)
    }

    fn fdb_msg(index: u32, mac: Mac) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        // NTF_SELF: the VXLAN device's own FDB. Without it the kernel writes to the FDB of
        // the bridge the device is enslaved to.
        m.header.flags = NeighbourFlags::Own;
        m.header.kind = RouteType::Unspec;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        m
    }

    /// Add a static entry. The all-zeros MAC is *appended* (one remote per node, like
    /// `bridge fdb append`); a unicast MAC is created or replaced (so a task moving to another
    /// node is one message).
    pub async fn fdb_add(&self, index: u32, e: &FdbEntry) -> Result<(), rtnetlink::Error> {
        let mut m = Self::fdb_msg(index, e.mac);
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                e.dst,
            )));
        let mode = if e.mac.is_zero() {
            NLM_F_APPEND
        } else {
            NLM_F_REPLACE
        };
        self.ack(RouteNetlinkMessage::NewNeighbour(m), NLM_F_CREATE | mode)
            .await
    }

    /// Delete one remote of an entry as observed (its destination, port, VNI and ifindex
    /// identify it; without a destination the whole entry goes). Gone already is fine.
    pub async fn fdb_del(&self, index: u32, o: &ObservedFdb) -> Result<(), rtnetlink::Error> {
        let mut m = Self::fdb_msg(index, o.mac);
        match o.dst {
            Some(IpAddr::V4(a)) => m
                .attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(a))),
            Some(IpAddr::V6(a)) => m
                .attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(a))),
            None => {}
        }
        if let Some(p) = o.port {
            m.attributes.push(NeighbourAttribute::Port(p));
        }
        if let Some(v) = o.vni {
            m.attributes.push(NeighbourAttribute::Vni(v));
        }
        if let Some(i) = o.ifindex {
            m.attributes.push(NeighbourAttribute::IfIndex(i));
        }
        if let Some(v) = o.src_vni {
            m.attributes.push(NeighbourAttribute::SourceVni(v));
        }
        match self.ack(RouteNetlinkMessage::DelNeighbour(m), 0).await {
            Err(e) if is_errno(&e, &[libc::ENOENT]) => Ok(()),
            r => r,
        }
    }

    /// The device's IPv4 neighbour entries.
    pub async fn neigh_list(&self, index: u32) -> Result<Vec<ObservedNeigh>, rtnetlink::Error> {
        let mut s = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await? {
            if m.header.ifindex != index || m.header.family != AddressFamily::Inet {
                continue;
            }
            if let Some(o) = neigh_from_msg(&m) {
                out.push(o);
            }
        }
        Ok(out)
    }

    /// Write a permanent entry (create or replace).
    pub async fn neigh_add(&self, index: u32, e: &NeighEntry) -> Result<(), rtnetlink::Error> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(e.ip))
            .link_layer_address(&e.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
    }

    /// Delete an entry. Gone already is fine.
    pub async fn neigh_del(&self, index: u32, ip: Ipv4Addr) -> Result<(), rtnetlink::Error> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = index;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.handle.neighbours().del(m).execute().await {
            Err(e) if is_errno(&e, &[libc::ENOENT]) => Ok(()),
            r => r,
        }
    }
}
