//! Keeping the library across exec: the environment a new program gets
//! must still preload this library and carry the EFUSE_* settings, even
//! when the program dropped them (`env -i`, a cleaned environment).

/// Is `lib` one of the entries of an LD_PRELOAD value (colon or space
/// separated)?
fn preloads(value: &[u8], lib: &[u8]) -> bool {
    value.split(|b| *b == b':' || *b == b' ').any(|e| e == lib)
}

/// `envp` with the library's variables put back, or None when nothing is
/// missing (the caller then passes the original untouched). `kept` holds
/// "NAME=value" of the variables set when the library was loaded; `lib` is
/// the library's own path, which LD_PRELOAD must name.
pub fn patch(envp: &[&[u8]], kept: &[Vec<u8>], lib: Option<&[u8]>) -> Option<Vec<Vec<u8>>> {
    let mut out: Vec<Vec<u8>> = envp.iter().map(|e| e.to_vec()).collect();
    let mut changed = false;
    for kv in kept {
        let Some(eq) = kv.iter().position(|b| *b == b'=') else { continue };
        let name = &kv[..=eq];
        let pos = out.iter().position(|e| e.starts_with(name));
        if name == b"LD_PRELOAD=" {
            let lib = lib.unwrap_or(&kv[eq + 1..]);
            match pos {
                Some(i) if preloads(&out[i][eq + 1..], lib) => {}
                Some(i) => {
                    let mut v = b"LD_PRELOAD=".to_vec();
                    v.extend_from_slice(lib);
                    if out[i].len() > eq + 1 {
                        v.push(b':');
                        v.extend_from_slice(&out[i][eq + 1..]);
                    }
                    out[i] = v;
                    changed = true;
                }
                None => {
                    let mut v = b"LD_PRELOAD=".to_vec();
                    v.extend_from_slice(lib);
                    out.push(v);
                    changed = true;
                }
            }
        } else if pos.is_none() {
            out.push(kv.clone());
            changed = true;
        }
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept() -> Vec<Vec<u8>> {
        vec![b"LD_PRELOAD=/opt/lib/libefuse_preload.so".to_vec(), b"EFUSE_BYPASS_MOUNTS=/mnt/e".to_vec()]
    }
    const LIB: &[u8] = b"/opt/lib/libefuse_preload.so";

    #[test]
    fn an_intact_environment_is_left_alone() {
        let env: Vec<&[u8]> =
            vec![b"PATH=/bin", b"LD_PRELOAD=/x.so:/opt/lib/libefuse_preload.so", b"EFUSE_BYPASS_MOUNTS=/m"];
        assert_eq!(patch(&env, &kept(), Some(LIB)), None);
    }

    #[test]
    fn an_empty_environment_gets_everything_back() {
        let got = patch(&[], &kept(), Some(LIB)).expect("patched");
        assert_eq!(got, kept());
    }

    #[test]
    fn a_foreign_preload_keeps_its_library_after_ours() {
        let env: Vec<&[u8]> = vec![b"LD_PRELOAD=/other.so", b"HOME=/root"];
        let got = patch(&env, &kept(), Some(LIB)).expect("patched");
        assert_eq!(got[0], b"LD_PRELOAD=/opt/lib/libefuse_preload.so:/other.so");
        assert_eq!(got[1], b"HOME=/root");
        assert_eq!(got[2], b"EFUSE_BYPASS_MOUNTS=/mnt/e");
        let env: Vec<&[u8]> = vec![b"LD_PRELOAD="];
        let got = patch(&env, &kept(), Some(LIB)).expect("patched");
        assert_eq!(got[0], b"LD_PRELOAD=/opt/lib/libefuse_preload.so");
    }
}
