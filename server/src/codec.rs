//! The envelope around every stored value, log entry and opaque token. It
//! lives in `geokv-proto` so the client can read session tokens too.

pub use geokv_proto::envelope::*;
