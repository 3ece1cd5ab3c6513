//! Reading the PROXY protocol v2 header of a proxy route (`host/src/proxy.rs`) with the
//! `ppp` crate, a parser that is not ours: shared by the simulated-VMM and real-guest tests.

use std::io::Read;

use anyhow::{bail, ensure, Context, Result};
use ppp::v2::{AddressFamily, Addresses, Command, Header, Protocol};

/// What the header said about one connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Named {
    pub src_cid: u32,
    pub dst_cid: u32,
    pub src_port: u32,
    pub dst_port: u32,
    pub id: u64,
}

/// Reads exactly one PROXY v2 header from `s` (its fixed part tells the length) and parses it
/// with `ppp`.
pub fn read_header(s: &mut impl Read) -> Result<Named> {
    let mut head = vec![0u8; 16];
    s.read_exact(&mut head).context("PROXY header")?;
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    head.resize(16 + len, 0);
    s.read_exact(&mut head[16..]).context("PROXY header TLVs")?;
    let h = Header::try_from(&head[..]).map_err(|e| anyhow::anyhow!("ppp: {e:?}"))?;
    ensure!(h.command == Command::Proxy, "command {:?}", h.command);
    ensure!(h.protocol == Protocol::Stream, "protocol {:?}", h.protocol);
    ensure!(h.address_family() == AddressFamily::Unix);
    ensure!(
        h.as_bytes().len() == 262,
        "header length {}",
        h.as_bytes().len()
    );
    let Addresses::Unix(unix) = h.addresses else {
        bail!("addresses {:?}", h.addresses);
    };
    let name = |a: &[u8; 108]| {
        let end = a.iter().position(|b| *b == 0).unwrap_or(a.len());
        String::from_utf8_lossy(&a[..end]).into_owned()
    };
    let names = (name(&unix.source), name(&unix.destination));
    let (mut vsock, mut id) = (None, None);
    for tlv in h.tlvs() {
        let tlv = tlv.map_err(|e| anyhow::anyhow!("ppp tlv: {e:?}"))?;
        let v = &tlv.value;
        match tlv.kind {
            0xE0 => {
                ensure!(v.len() == 16, "vsock TLV of {} bytes", v.len());
                let u = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
                vsock = Some((u(0), u(4), u(8), u(12)));
            }
            0x05 => {
                ensure!(v.len() == 8, "unique id of {} bytes", v.len());
                id = Some(u64::from_be_bytes(v[..8].try_into()?));
            }
            k => bail!("unexpected TLV {k:#x}"),
        }
    }
    let (src_cid, dst_cid, src_port, dst_port) = vsock.context("no vsock TLV")?;
    ensure!(
        names
            == (
                format!("vsock:{src_cid}:{src_port}"),
                format!("vsock:{dst_cid}:{dst_port}")
            ),
        "address names {names:?} against the TLV"
    );
    Ok(Named {
        src_cid,
        dst_cid,
        src_port,
        dst_port,
        id: id.context("no unique id TLV")?,
    })
}
