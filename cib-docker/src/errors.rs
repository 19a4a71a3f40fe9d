//! Turning Docker API failures into the port's error kinds.
//!
//! The engine decides what to retry by kind alone: a daemon that cannot be reached needs a
//! person (misconfigured), a server error or a timeout may pass (transient), and a request the
//! daemon refuses as such, like a missing image or an invalid name, will be refused again
//! (permanent).

use std::io;

use bollard::errors::Error as DockerError;
use cib_core::ports::ExecError;

/// The HTTP status of a Docker error response, if it was one.
pub fn status(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Whether the daemon answered "no such thing": removing or stopping it again is then done.
pub fn is_not_found(e: &DockerError) -> bool {
    status(e) == Some(404)
}

/// The first I/O error in the chain of causes, which says whether the daemon was reachable.
fn io_cause(e: &DockerError) -> Option<&io::Error> {
    // `IOError` is transparent: its `source()` skips the I/O error itself.
    if let DockerError::IOError { err } = e {
        return Some(err);
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cause = c.source();
    }
    None
}

/// Maps a Docker error, with what was being done, to an [`ExecError`] of the right kind.
pub fn exec_error(doing: &str, e: DockerError) -> ExecError {
    let message = format!("docker: {doing}: {e}");
    match &e {
        DockerError::DockerResponseServerError { status_code, .. } => {
            if *status_code >= 500 {
                ExecError::Transient(message)
            } else {
                ExecError::Permanent(message)
            }
        }
        DockerError::RequestTimeoutError => ExecError::Transient(message),
        DockerError::SocketNotFoundError(_)
        | DockerError::UnsupportedURISchemeError { .. }
        | DockerError::APIVersionParseError {}
        | DockerError::InvalidURIError { .. }
        | DockerError::URLParseError { .. } => ExecError::Misconfigured(message),
        DockerError::JsonDataError { .. } | DockerError::JsonSerdeError { .. } => ExecError::Permanent(message),
        _ => match io_cause(&e).map(io::Error::kind) {
            Some(io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied) => {
                ExecError::Misconfigured(format!("{message} (is the Docker daemon running and reachable?)"))
            }
            _ => ExecError::Transient(message),
        },
    }
}

#[cfg(test)]
mod tests {
    use cib_core::ports::ErrorKind;

    use super::*;

    fn server(status_code: u16) -> DockerError {
        DockerError::DockerResponseServerError { status_code, message: "boom".into() }
    }

    #[test]
    fn kinds_follow_the_status() {
        assert_eq!(exec_error("x", server(404)).kind(), ErrorKind::Permanent);
        assert_eq!(exec_error("x", server(400)).kind(), ErrorKind::Permanent);
        assert_eq!(exec_error("x", server(500)).kind(), ErrorKind::Transient);
        assert_eq!(exec_error("x", server(503)).kind(), ErrorKind::Transient);
        assert_eq!(exec_error("x", DockerError::RequestTimeoutError).kind(), ErrorKind::Transient);
    }

    #[test]
    fn an_unreachable_daemon_is_misconfigured() {
        let refused = DockerError::IOError { err: io::Error::new(io::ErrorKind::ConnectionRefused, "refused") };
        assert_eq!(exec_error("ping", refused).kind(), ErrorKind::Misconfigured);
        let missing = DockerError::SocketNotFoundError("/nope.sock".into());
        let e = exec_error("connect", missing);
        assert_eq!(e.kind(), ErrorKind::Misconfigured);
        assert!(e.message().contains("/nope.sock"), "{e}");
        let reset = DockerError::IOError { err: io::Error::new(io::ErrorKind::ConnectionReset, "reset") };
        assert_eq!(exec_error("ping", reset).kind(), ErrorKind::Transient);
    }

    #[test]
    fn messages_say_what_was_being_done() {
        let e = exec_error("creating network n", server(500));
        assert!(e.message().starts_with("docker: creating network n: "), "{e}");
    }
}
