//! Checking plugin-chosen routes against the operator's allowlist.
pub use crate::route::{tcp_route_port, RouteAllowlist, RouteError, MAX_TCP_TARGET, MAX_UNIX_PATH};

use super::types::{ConnRequest, Route};

/// Decides whether a CID is a sibling of the VM a request comes from (same group).
pub trait SiblingCheck: Send + Sync {
    fn is_sibling(&self, req: &ConnRequest, cid: u64) -> bool;
}

impl<F: Fn(&ConnRequest, u64) -> bool + Send + Sync> SiblingCheck for F {
    fn is_sibling(&self, req: &ConnRequest, cid: u64) -> bool {
        self(req, cid)
    }
}

/// A [`SiblingCheck`] for which no CID is a sibling.
pub struct NoSiblings;

impl SiblingCheck for NoSiblings {
    fn is_sibling(&self, _: &ConnRequest, _: u64) -> bool {
        false
    }
}

/// Checks a plugin's [`Route`] against a [`RouteAllowlist`].
pub trait RouteCheck {
    /// Check a route chosen by a plugin for `req`.
    fn check(
        &self,
        req: &ConnRequest,
        route: &Route,
        siblings: &dyn SiblingCheck,
    ) -> Result<(), RouteError>;
}

impl RouteCheck for RouteAllowlist {
    fn check(
        &self,
        req: &ConnRequest,
        route: &Route,
        siblings: &dyn SiblingCheck,
    ) -> Result<(), RouteError> {
        match route {
            Route::Default => Ok(()),
            Route::UnixSocket(p) | Route::ProxyUnix(p) => self.allows_unix(p),
            Route::Tcp(t) | Route::ProxyTcp(t) => self.allows_tcp(t),
            // The host kernel's CID namespace, never a sibling: only a listed entry admits it.
            Route::HostVsock(ep) => self.allows_vsock(ep.cid, ep.port),
            Route::Vsock(ep) => {
                // 0 hypervisor, 1 local, 2 host, u32::MAX = VMADDR_CID_ANY.
                if ep.cid <= 2 || ep.cid >= u64::from(u32::MAX) {
                    return Err(RouteError::ReservedCid(ep.cid));
                }
                if siblings.is_sibling(req, ep.cid) {
                    Ok(())
                } else {
                    Err(RouteError::NotSibling(ep.cid))
                }
            }
        }
    }
}
