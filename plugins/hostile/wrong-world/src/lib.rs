//! Hostile test plugin: claims the `vhost-plug:plugin` interface names but with wrong function
//! signatures (and without the `host` import), so `check` must say what does not match.

wit_bindgen::generate!({
    inline: r#"
        package vhost-plug:plugin@0.1.0;
        interface policy {
            on-connect: func(port: u32) -> bool;
        }
        interface stateful {
            export-state: func() -> list<u8>;
        }
        world wrong {
            export policy;
            export stateful;
        }
    "#,
    world: "wrong",
});

struct Wrong;

impl exports::vhost_plug::plugin::policy::Guest for Wrong {
    fn on_connect(port: u32) -> bool {
        port != 22
    }
}

impl exports::vhost_plug::plugin::stateful::Guest for Wrong {
    fn export_state() -> Vec<u8> {
        Vec::new()
    }
}

export!(Wrong);
