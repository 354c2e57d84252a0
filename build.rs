//! Rebuild when `migrations/` changes: `sqlx::migrate!` embeds the files at compile time, and
//! cargo does not otherwise notice a new or edited migration.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
