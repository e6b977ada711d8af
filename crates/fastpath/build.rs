//! Compiles `bpf/fastpath.c` with clang when the `ebpf` feature is on. Without clang the crate
//! still builds: `FastPath::load` then reports that the program is not built in, and the
//! daemon runs the TUN path.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/fastpath.c");
    println!("cargo:rerun-if-env-changed=RINGLB_CLANG");
    println!("cargo::rustc-check-cfg=cfg(fastpath_built)");
    if env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return;
    }
    let clang = env::var("RINGLB_CLANG").unwrap_or_else(|_| "clang".into());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("fastpath.o");
    // Debian keeps asm/ headers under the multiarch directory.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-I", &multiarch, "-c", "bpf/fastpath.c", "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => println!("cargo:rustc-cfg=fastpath_built"),
        Ok(s) => println!(
            "cargo:warning=the eBPF fast path was not built: `{clang}` failed ({s}); \
             it needs clang and libbpf-dev (apt install clang libbpf-dev). The TUN path is unaffected."
        ),
        Err(e) => println!(
            "cargo:warning=the eBPF fast path was not built: `{clang}` could not run ({e}); \
             install clang and libbpf-dev (apt install clang libbpf-dev). The TUN path is unaffected."
        ),
    }
}
