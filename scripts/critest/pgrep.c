#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
  if (argc < 2) return 2;
  DIR *d = opendir("/proc"); struct dirent *e; int found = 1;
  while ((e = readdir(d))) {
    int pid = atoi(e->d_name); if (pid <= 0 || pid == getpid()) continue;
    char p[64], c[64] = {0}; snprintf(p, sizeof p, "/proc/%d/comm", pid);
    FILE *f = fopen(p, "r"); if (!f) continue;
    if (fgets(c, sizeof c, f)) { c[strcspn(c, "\n")] = 0; if (strstr(c, argv[1])) { printf("%d\n", pid); found = 0; } }
    fclose(f);
  }
  return found;
}
