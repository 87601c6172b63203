//! Names of the columns the default producers publish, shared by producers and the
//! scorers that read them so the two can never drift apart.

/// Per candidate: how many of the request's prefix blocks, consecutively from the start,
/// the approximate prefix index believes the endpoint holds.
pub const PREFIX_MATCHED_BLOCKS: &str = "prefix-cache/matched-blocks";

/// Per candidate (same value for all): how many prefix blocks the request has.
pub const PREFIX_TOTAL_BLOCKS: &str = "prefix-cache/total-blocks";

/// Per candidate: how many block hashes the prefix index holds for the endpoint (its share
/// of the index; the host sums it into the indexer-size metric).
pub const PREFIX_INDEXED_BLOCKS: &str = "prefix-cache/indexed-blocks";
