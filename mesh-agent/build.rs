//! Builds the eBPF object (through xtask's build logic) and puts it in OUT_DIR, where
//! `src/ebpf/loader.rs` embeds it with `include_bytes_aligned!`.
fn main() {
    for p in xtask::ebpf_sources() {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    match xtask::build_ebpf() {
        Ok(obj) => {
            std::fs::copy(&obj, out.join("mesh.bpf.o")).expect("copy eBPF object to OUT_DIR");
        }
        Err(e) => panic!("mesh-agent embeds the eBPF object and could not build it: {e}"),
    }
}
