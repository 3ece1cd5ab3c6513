//! Plugin state across plugin versions.

use super::*;

/// Both versions under one plugin name, so that the state record's entry matches.
const ALLOWLIST_V1: &[&str] = &[
    "--plugin",
    "policy=builtin:port-allowlist-v1,name=allowlist,config=allow=2:*",
    "--plugin",
    "serializer=builtin:serializer-json",
];
const ALLOWLIST_V2: &[&str] = &[
    "--plugin",
    "policy=builtin:port-allowlist,name=allowlist,config=allow=2:*",
    "--plugin",
    "serializer=builtin:serializer-json",
];

/// (schema, hits of rule `2:*`) of the `allowlist` plugin state in a serializer-json blob.
/// Both versions start their data with the schema-1 body: (rule key, hits) pairs.
fn allowlist_hits(blob: &[u8]) -> Result<(u32, u64)> {
    let states = json_plugin_states(blob)?;
    let st = states
        .iter()
        .find(|p| p.name == "allowlist")
        .with_context(|| format!("no allowlist state among {states:?}"))?;
    let mut r = StateReader::new(&st.data);
    for _ in 0..r.u32()? {
        let key = r.bytes()?;
        let hits = r.u64()?;
        if key == b"2:*" {
            return Ok((st.schema, hits));
        }
    }
    bail!("no rule `2:*` in the allowlist state")
}

/// A blob from a daemon with `args` whose VM made `n` allowed connections; also returns the
/// blob taken before any connection.
fn plugin_blobs(s: &Setup, n: u32) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut vm = s.boot_with(0, state_cfg(QueueSet::All), DriverConfig::default())?;
    let uds = vm.spec.uds_path.clone();
    let before = snapshot(&mut vm, XFER)?;
    for i in 0..n {
        guest_to_host(&vm.guest, &uds, 9500 + i)?;
    }
    let after = snapshot(&mut vm, XFER)?;
    vm.shutdown();
    Ok((before, after))
}

#[test]
fn plugin_state_v1_loads_into_v2() -> Result<()> {
    let src = daemon(3, ALLOWLIST_V1)?;
    let dst = daemon(3, ALLOWLIST_V2)?;
    let res = (|| -> Result<()> {
        let (blob0, blob5) = plugin_blobs(&src, 5)?;
        ensure!(
            blob0 != blob5,
            "the blob after 5 allowed connections equals the one before: the v1 hit counters \
             are not in the state"
        );
        ensure!(
            allowlist_hits(&blob5)? == (1, 5),
            "v1 state after 5 connections: {:?}",
            allowlist_hits(&blob5)?
        );
        let sim = SimVmm::connect(&dst.vms[0].socket, fresh_cfg(QueueSet::All))?;
        expect_loaded(&sim.load_state(&blob5, XFER)?, "v1 state into v2")?;
        ensure!(alive(&dst), "v2 daemon died");
        let mut vm = start_after_live_load(sim, dst.vms[0].clone())?;
        // `allow=2:*` admits guest -> host connections only.
        guest_to_host(&vm.guest, &dst.vms[0].uds_path, 9600)
            .context("guest -> host after the load")?;
        // v2 carried the 5 hits over and counted one more.
        let v2 = allowlist_hits(&snapshot(&mut vm, XFER)?)?;
        ensure!(
            v2 == (2, 6),
            "v2 state after the load and one connection: {v2:?}"
        );
        vm.shutdown();
        Ok(())
    })();
    with_stderr(with_stderr(res, &src), &dst)
}

#[test]
fn plugin_state_v2_into_v1_is_refused() -> Result<()> {
    let src = daemon(3, ALLOWLIST_V2)?;
    let dst = daemon(3, ALLOWLIST_V1)?;
    let res = (|| -> Result<()> {
        let (_, blob) = plugin_blobs(&src, 3)?;
        let sim = SimVmm::connect(&dst.vms[0].socket, fresh_cfg(QueueSet::All))?;
        let r = sim.load_state(&blob, XFER)?;
        ensure!(
            r.check.is_err(),
            "v2 plugin state (schema 2) loaded into a daemon running port-allowlist v1"
        );
        ensure!(alive(&dst), "v1 daemon died");
        let log = dst.daemon.stderr();
        ensure!(
            log.contains("schema"),
            "the v1 daemon's log does not say why the load failed (no mention of the schema)"
        );
        // The refused load changed nothing: the v1 device works and its policy still allows.
        let vm = start_after_load(sim, dst.vms[0].clone())?;
        // `allow=2:*` admits guest -> host connections only.
        guest_to_host(&vm.guest, &dst.vms[0].uds_path, 9700)
            .context("guest -> host after the refused load")?;
        vm.shutdown();
        Ok(())
    })();
    with_stderr(with_stderr(res, &src), &dst)
}
