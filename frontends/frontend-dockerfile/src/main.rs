//! kiln's Dockerfile frontend as a standalone binary speaking the frontend
//! protocol on stdin/stdout (what `# syntax=` selects for native frontends).

fn main() {
    kiln_frontend_stdio::serve_stdio("kiln-frontend-dockerfile", kiln_dockerfile::compile)
}
