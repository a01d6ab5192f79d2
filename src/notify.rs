//! systemd readiness notification (`Type=notify`): sends `READY=1` once
//! recovery has finished and `STOPPING=1` when shutdown begins, to the datagram
//! socket systemd names in `NOTIFY_SOCKET`. Without that variable (not under
//! systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends one notification, e.g. `"READY=1\nSTATUS=serving"`. Failures are
/// logged, never fatal: the service works without the notification.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // Linux abstract namespace.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}
