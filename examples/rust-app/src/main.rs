//! `service 15m` prints 900.

fn main() {
    let mut failed = false;
    for arg in std::env::args().skip(1) {
        match service::seconds(&arg) {
            Ok(seconds) => println!("{seconds}"),
            Err(error) => {
                eprintln!("{arg}: {error:?}");
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
