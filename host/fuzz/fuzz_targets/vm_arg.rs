//! The `--vm KEY=VALUE,...` option: the input is split on NUL bytes into up to 8 `--vm` values
//! and parsed as the command line does (per-key checks, defaults, then the rules across VMs).
//!
//! Checked: no panic; an accepted set has one VM per value and passes
//! `DaemonConfig::validate` (the parser lets through nothing the rules refuse).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_plug_parse::config::fuzzing::parse_vm_args;
use vhost_plug_parse::config::DaemonConfig;

fuzz_target!(|data: &[u8]| {
    // Command-line values reach the parser as UTF-8 (clap refuses anything else first).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let values: Vec<&str> = text.split('\0').take(8).collect();
    if let Ok(vms) = parse_vm_args(&values) {
        assert_eq!(vms.len(), values.len());
        let cfg = DaemonConfig::new(vms);
        if let Err(e) = cfg.validate() {
            panic!("parsed --vm values break the rules: {e}\n{cfg:?}");
        }
    }
});
