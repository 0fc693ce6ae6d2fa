//! mesh's eBPF programs. Entry points only: each counts its verdict and delegates.
//!
//! - `mesh_xdp_ingress`  XDP on the node's external interface: published ports → tasks.
//! - `mesh_tc_ingress`   the same from TC ingress (tcx), for links where XDP costs more.
//! - `mesh_tc_task`      TC ingress of each task's host-side veth: replies → reverse NAT.
//! - `mesh_connect4` / `mesh_sendmsg4` / `mesh_recvmsg4` / `mesh_getpeername4`:
//!   socket-level LB for processes on the node itself.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod lb;
mod maps;
mod parse;
mod sock;
mod tc;
mod xdp;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action::XDP_PASS},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

use crate::maps::count;

// Inlined into the entry point aya's macro wraps it in: left to LLVM, a body this size
// becomes a BPF-to-BPF call on every packet.
#[xdp]
#[inline(always)]
pub fn mesh_xdp_ingress(ctx: XdpContext) -> u32 {
    match xdp::xdp_ingress(&ctx) {
        Ok(action) => action,
        Err(why) => {
            count(why);
            XDP_PASS
        }
    }
}

#[classifier]
pub fn mesh_tc_ingress(ctx: TcContext) -> i32 {
    match tc::tc_ingress(&ctx) {
        Ok(action) => action,
        Err(why) => {
            count(why);
            TC_ACT_OK
        }
    }
}

#[classifier]
pub fn mesh_tc_task(ctx: TcContext) -> i32 {
    match tc::tc_from_task(&ctx) {
        Ok(action) => action,
        Err(why) => {
            count(why);
            TC_ACT_OK
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    sock::sock4_translate(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sock4_translate(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::sock4_reverse(&ctx);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::sock4_reverse(&ctx);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
