//! Embeds the provider presets (`presets/*.toml`, SPEC §10): adding a preset is adding a file.

use std::fmt::Write;
use std::path::Path;

fn main() {
    // Read when the script runs, not when it was compiled: a build script compiled for one
    // checkout may be run again for another that shares the target folder.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest_dir).join("presets");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("the presets folder")
        .map(|entry| entry.expect("a presets folder entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .map(|path| {
            println!("cargo:rerun-if-changed={}", path.display());
            let name = path.file_stem().expect("a file name").to_string_lossy().into_owned();
            (name, path.display().to_string())
        })
        .collect();
    names.sort();
    let mut code = String::from(
        "/// Every built-in preset: (name, the TOML it stands for), sorted by name.\npub const PRESETS: &[(&str, &str)] = &[\n",
    );
    for (name, path) in &names {
        writeln!(code, "    ({name:?}, include_str!({path:?})),").expect("writing to a String");
    }
    code.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("presets.rs");
    std::fs::write(out, code).expect("writing presets.rs");
}
