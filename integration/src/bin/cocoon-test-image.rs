//! Writes the test/demo busybox image (from Debian's static busybox) as an
//! OCI archive for `ctr images import`: no registry is reachable here.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(busybox), Some(out)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: cocoon-test-image <static busybox> <out.tar>");
        std::process::exit(2);
    };
    if !std::path::Path::new(busybox).is_file() {
        eprintln!("cocoon-test-image: {busybox} not found (apt-get install busybox-static)");
        std::process::exit(1);
    }
    cocoon_integration::image::write_archive(busybox.as_ref(), out.as_ref());
    println!("{}", cocoon_integration::image::IMAGE_REF);
}
