//! kiln's recipe frontend as a standalone program speaking the frontend
//! protocol on stdin/stdout.

fn main() {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut output = std::io::stdout().lock();
    if let Err(e) = kiln_frontend_stdio::serve(&mut input, &mut output, kiln_recipe::compile) {
        eprintln!("kiln-frontend-recipe: {e}");
        std::process::exit(2);
    }
}
