//! Socket-level load balancing: the destination is translated once, when a socket connects
//! (or per datagram for unconnected UDP), so no packet is ever rewritten.
//!
//! - On the node itself (`curl localhost:8080`, `curl NODE_IP:8080`): published ports, which
//!   XDP and TC never see for local traffic.
//! - In the tasks of this node: service VIPs (east-west). A VIP is only reachable from a task
//!   attached to the VIP's network; any other task gets EPERM (counted).
//!
//! cgroup hooks fire for every process of the cgroup whatever its netns, so they act only in
//! the node's netns (`CONFIG.netns_cookie`) and in the task namespaces listed in `TASK_NETS`.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use mesh_common::{Frontend, SockRevEntry, SockRevKey, TaskNetKey, fe_flags, reason};

use crate::{
    lb,
    maps::{CONFIG, SOCK_REV, TASK_NETS, count},
};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// Let the socket call proceed.
pub const ALLOW: i32 = 1;
/// Refuse it (the caller gets EPERM).
pub const DENY: i32 = 0;

/// Where the calling socket lives.
enum Scope {
    Node,
    Task(u64),
    Elsewhere,
}

#[inline(always)]
fn scope(ctx: &SockAddrContext) -> Scope {
    // SAFETY: helper valid for sock_addr programs (kernel ≥ 5.7).
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match CONFIG.get(0) {
        Some(cfg) if cfg.netns_cookie != 0 && cfg.netns_cookie == cookie => return Scope::Node,
        _ => {}
    }
    let marker = TaskNetKey {
        cookie,
        net_id: 0,
        _pad: 0,
    };
    if TASK_NETS.get_ptr(marker).is_some() {
        Scope::Task(cookie)
    } else {
        Scope::Elsewhere
    }
}

#[inline(always)]
fn is_loopback(addr: u32) -> bool {
    u32::from_be(addr) >> 24 == 127
}

/// connect4 / sendmsg4: point the socket at a backend of the frontend it addresses.
#[inline(always)]
pub fn sock4_translate(ctx: &SockAddrContext, record_rev: bool) -> i32 {
    let scope = scope(ctx);
    if let Scope::Elsewhere = scope {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: fields of the context the kernel gave us.
    let (daddr, dport, protocol) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol) };
    let proto = match protocol {
        IPPROTO_TCP => mesh_common::proto::TCP,
        IPPROTO_UDP => mesh_common::proto::UDP,
        _ => return ALLOW,
    };
    if let Scope::Task(_) = scope {
        if dns4_redirect(ctx, daddr, dport, record_rev) {
            return ALLOW;
        }
    }
    let fe: Frontend = match scope {
        Scope::Node => {
            if !lb::lb4_port_wanted(dport) || !(is_loopback(daddr) || lb::lb4_is_node_addr(daddr)) {
                return ALLOW;
            }
            match lb::lb4_lookup_frontend(0, dport, proto) {
                Some(fe) => fe,
                None => return ALLOW,
            }
        }
        Scope::Task(cookie) => {
            let fe = match lb::lb4_lookup_frontend(daddr, dport, proto) {
                Some(fe) => fe,
                None => match lb::lb4_lookup_frontend(daddr, 0, proto) {
                    Some(fe) => fe,
                    None => return ALLOW,
                },
            };
            if fe.flags & fe_flags::VIP == 0 {
                return ALLOW;
            }
            let member = TaskNetKey {
                cookie,
                net_id: fe.net_id,
                _pad: 0,
            };
            if TASK_NETS.get_ptr(member).is_none() {
                // Networks isolate VIPs as they isolate packets.
                count(reason::DROP_VIP_OTHER_NETWORK);
                return DENY;
            }
            fe
        }
        Scope::Elsewhere => return ALLOW,
    };
    let Some((be_id, be)) = lb::lb4_select_backend(&fe) else {
        count(reason::SOCK_NO_BACKEND);
        return ALLOW;
    };
    let port = if be.port == 0 { dport } else { be.port };
    // SAFETY: writable fields for connect4/sendmsg4.
    unsafe {
        (*sa).user_ip4 = be.addr;
        (*sa).user_port = port as u32;
    }
    lb::lb4_account_sock(fe.svc_id, be_id);
    count(reason::SOCK_TRANSLATED);
    if record_rev {
        // SAFETY: helper valid for sock_addr programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let key = SockRevKey {
            cookie,
            addr: be.addr,
            port,
            _pad: 0,
        };
        let val = SockRevEntry {
            addr: daddr,
            port: dport,
            _pad: 0,
        };
        let _ = SOCK_REV.insert(key, val, 0);
    }
    ALLOW
}

/// 127.0.0.11:53 in a task → the port the embedded DNS server really listens on.
#[inline(always)]
fn dns4_redirect(ctx: &SockAddrContext, daddr: u32, dport: u16, record_rev: bool) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    if cfg.dns_port == 0
        || daddr != u32::from_ne_bytes(mesh_common::DNS_ADDR)
        || dport != 53u16.to_be()
    {
        return false;
    }
    let port = cfg.dns_port.to_be();
    // SAFETY: writable field for connect4/sendmsg4.
    unsafe { (*ctx.sock_addr).user_port = port as u32 };
    if record_rev {
        // SAFETY: helper valid for sock_addr programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let key = SockRevKey {
            cookie,
            addr: daddr,
            port,
            _pad: 0,
        };
        let _ = SOCK_REV.insert(
            key,
            SockRevEntry {
                addr: daddr,
                port: dport,
                _pad: 0,
            },
            0,
        );
    }
    true
}

/// recvmsg4 / getpeername4: show the application the address it talked to, not the backend.
#[inline(always)]
pub fn sock4_reverse(ctx: &SockAddrContext) {
    if let Scope::Elsewhere = scope(ctx) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: helper valid for sock_addr programs; fields of the context.
    let key = unsafe {
        SockRevKey {
            cookie: bpf_get_socket_cookie(ctx.as_ptr()),
            addr: (*sa).user_ip4,
            port: (*sa).user_port as u16,
            _pad: 0,
        }
    };
    // SAFETY: copied out at once.
    if let Some(orig) = SOCK_REV.get_ptr(key).map(|p| unsafe { *p }) {
        unsafe {
            (*sa).user_ip4 = orig.addr;
            (*sa).user_port = orig.port as u32;
        }
    }
}
