//! kiln's Dockerfile frontend as a standalone binary speaking the frontend
//! protocol on stdin/stdout (what `# syntax=` selects for native frontends).

fn main() {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut output = std::io::stdout().lock();
    if let Err(e) = kiln_frontend_stdio::serve(&mut input, &mut output, kiln_dockerfile::compile) {
        eprintln!("kiln-frontend-dockerfile: {e}");
        std::process::exit(2);
    }
}
