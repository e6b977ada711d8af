//! `netlab bench`: see `Cmd::Bench`.

use std::path::Path;

use anyhow::Result;

pub fn run(prefix: &str, bin: &Path, out: &Path, quick: bool) -> Result<()> {
    let _ = (prefix, bin, out, quick);
    anyhow::bail!("not written yet")
}
