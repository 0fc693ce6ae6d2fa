//! Socket-level load balancing for processes on the node itself (`curl localhost:8080`,
//! `curl NODE_IP:8080`): XDP and TC never see that traffic. The destination is translated
//! once, when the socket connects (or per datagram for unconnected UDP), so no packet is
//! rewritten at all. cgroup hooks fire for every netns, so they act only in the node's.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use mesh_common::{SockRevEntry, SockRevKey, reason};

use crate::{
    lb,
    maps::{CONFIG, SOCK_REV, count},
};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    // SAFETY: helper valid for sock_addr programs (kernel ≥ 5.7).
    cfg.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.netns_cookie
}

#[inline(always)]
fn is_loopback(addr: u32) -> bool {
    u32::from_be(addr) >> 24 == 127
}

/// connect4 / sendmsg4: point the socket at a backend of the published port it addresses.
#[inline(always)]
pub fn sock4_translate(ctx: &SockAddrContext, record_rev: bool) {
    if !in_node_netns(ctx) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: fields of the context the kernel gave us.
    let (daddr, dport, protocol) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol) };
    let proto = match protocol {
        IPPROTO_TCP => mesh_common::proto::TCP,
        IPPROTO_UDP => mesh_common::proto::UDP,
        _ => return,
    };
    if !lb::lb4_port_wanted(dport) {
        return;
    }
    if !(is_loopback(daddr) || lb::lb4_is_node_addr(daddr)) {
        return;
    }
    let Some(fe) = lb::lb4_lookup_frontend(0, dport, proto) else {
        return;
    };
    let Some((be_id, be)) = lb::lb4_select_backend(&fe) else {
        count(reason::SOCK_NO_BACKEND);
        return;
    };
    // SAFETY: writable fields for connect4/sendmsg4.
    unsafe {
        (*sa).user_ip4 = be.addr;
        (*sa).user_port = be.port as u32;
    }
    lb::lb4_account_sock(fe.svc_id, be_id);
    count(reason::SOCK_TRANSLATED);
    if record_rev {
        // SAFETY: helper valid for sock_addr programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let key = SockRevKey {
            cookie,
            addr: be.addr,
            port: be.port,
            _pad: 0,
        };
        let val = SockRevEntry {
            addr: daddr,
            port: dport,
            _pad: 0,
        };
        let _ = SOCK_REV.insert(key, val, 0);
    }
}

/// recvmsg4 / getpeername4: show the application the address it talked to, not the backend.
#[inline(always)]
pub fn sock4_reverse(ctx: &SockAddrContext) {
    if !in_node_netns(ctx) {
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
