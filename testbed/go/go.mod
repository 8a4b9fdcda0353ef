module monitor.test/gotls

go 1.19
