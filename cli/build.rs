//! The binaries and tests of this crate find libtorch at run time without `LD_LIBRARY_PATH`:
//! tch-fabric publishes the folders its libraries live in (`DEP_TCH_FABRIC_RPATH`, one
//! `links` key away), and this turns them into an rpath. It also keeps `libtorch_cuda` linked
//! (no `--as-needed`), so a GPU machine sees CUDA. A crate without a build script sets
//! `LD_LIBRARY_PATH` instead (README, "Use it from your crate").
fn main() {
    let rpath = std::env::var("DEP_TCH_FABRIC_RPATH")
        .expect("tch-fabric publishes DEP_TCH_FABRIC_RPATH to its direct dependents");
    for dir in std::env::split_paths(&rpath) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
}
