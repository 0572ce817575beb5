#include <stdio.h>
#include <unistd.h>
#include <sys/wait.h>
int main(int argc, char **argv) {
  if (argv[0][0] != 'n') { char *a[] = {"nginx: master process nginx -g daemon off;", 0}; execv("/usr/sbin/nginx", a); return 1; }
  FILE *f = fopen("/var/run/nginx.pid", "w"); if (f) { fprintf(f, "%d\n", getpid()); fclose(f); }
  pid_t c = fork();
  if (c == 0) { char *a[] = {"httpd", "-f", "-p", "80", "-h", "/www", 0}; execv("/bin/busybox", a); _exit(1); }
  int s; while (wait(&s) > 0) {}
  return 0;
}
