#!/bin/bash
# sysc.sh NAME PORT PID: syscalls during 3 s of a 6 s wrk run; requests in the window from /proc-free estimate (wrk rate x 3).
NAME=$1 PORT=$2 PID=$3
wrk -t1 -c64 -d6s http://127.0.0.1:$PORT/ > wrk_$NAME.out &
WP=$!
sleep 1.5
perf stat -x, -e 'syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,raw_syscalls:sys_enter' -p $PID -- sleep 3 2> perf_$NAME.out
wait $WP
RPS=$(awk '/Requests\/sec/{print $2}' wrk_$NAME.out)
echo "$NAME rps=$RPS $(grep -E 'Socket|Non-2xx' wrk_$NAME.out)"
awk -F, -v rps=$RPS '{printf "  %-40s %10d  %.3f per request\n", $3, $1, $1/(rps*3)}' perf_$NAME.out
