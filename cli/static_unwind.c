/* cli/static_unwind.c: linked into the fully static executables of `make static` only.
 *
 * LuaJIT raises every Lua error with the C unwinder (_Unwind_RaiseException), which must find the
 * FDE of each frame. In a static executable, gcc's crtbeginT.o registers the whole .eh_frame with
 * __register_frame_info, and the first lookup in a registered object sorts every FDE of the
 * binary: the first Lua error of the process (a handler's 500, a pcall) would read all 770 KB of
 * .eh_frame into RSS and malloc a sorted copy. The link wraps the registration into these no-ops
 * and passes --eh-frame-hdr, so the unwinder takes the path of dynamic executables: dl_iterate_phdr
 * and the binary-search table of PT_GNU_EH_FRAME, touching a few pages per lookup. */
#include <stddef.h>

void __wrap___register_frame_info(const void *begin, void *ob);
void *__wrap___deregister_frame_info(const void *begin);

void __wrap___register_frame_info(const void *begin, void *ob) {
  (void)begin;
  (void)ob;
}

/* crtbeginT.o calls this at exit with what it registered: nothing was. */
void *__wrap___deregister_frame_info(const void *begin) {
  (void)begin;
  return NULL;
}
