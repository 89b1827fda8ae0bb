"""Pure atproto primitives: DAG-CBOR, CIDs, CAR, MST, commits, keys, syntax and frames. No I/O.

One process-wide setting is made here, before libipld is first used: Rust's library
backtraces are turned off. With ``RUST_BACKTRACE=1`` in the environment, libipld captures a
backtrace on every decode error; unwinding through a gevent greenlet's stack then crashes
the process (a segfault, triggered by any malformed frame from a hostile host), and even
where it does not crash it costs milliseconds per bad frame. See HACKING.md.
"""

import os as _os

_os.environ["RUST_LIB_BACKTRACE"] = "0"
