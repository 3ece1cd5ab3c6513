//! Hostile test plugin: its linear memory starts at 96 MiB (a large zeroed static), more than
//! a plugin may have (64 MiB), so it compiles and type-checks but can never be instantiated.
use vhost_plug_sdk_policy::*;

static mut BIG: [u8; 96 << 20] = [0; 96 << 20];

struct Hostile;

impl PolicyPlugin for Hostile {
    fn on_connect(req: ConnRequest) -> Verdict {
        // Touch the static so that it is kept.
        let i = req.dst.port as usize % (96 << 20);
        // SAFETY: plugins are single-threaded; nothing else holds a reference to BIG.
        let b = unsafe {
            std::ptr::addr_of_mut!(BIG)
                .cast::<u8>()
                .add(i)
                .read_volatile()
        };
        Verdict::Deny(format!("byte {b}"))
    }
}

vhost_plug_sdk_policy::export_policy!(Hostile);
