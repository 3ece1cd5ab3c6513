//! The YAML config file (`--config FILE`): the input is the file's text, parsed as at startup
//! (schema, per-field checks with positions, defaults, then the rules across VMs).
//!
//! Checked: no panic; an accepted config passes `DaemonConfig::validate`; every refusal
//! renders as a message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_plug_parse::config::fuzzing::parse_yaml;
use vhost_plug_parse::config::DaemonConfig;

fuzz_target!(|data: &[u8]| {
    // The daemon reads the file with read_to_string: non-UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_yaml(text) {
        Ok(vms) => {
            let cfg = DaemonConfig::new(vms);
            if let Err(e) = cfg.validate() {
                panic!("parsed config breaks the rules: {e}\n{cfg:?}");
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
