"""Pure atproto primitives: DAG-CBOR, CIDs, CAR, MST, commits, keys, syntax and frames. No I/O."""
